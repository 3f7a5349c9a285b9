"""The digits quality measure: classifier agreement and a pixel-space Fréchet distance.

Both are fixed, so numbers compare between runs and machines:

* Features: the 64 pixel intensities of an 8x8 digit on the data set's own 0..16 scale,
  read back from the uint8 images a run writes (intensity = value x 16/255; larger images,
  upsampled by a whole factor, are average-pooled back to 8x8; grey RGB uses channel 0).
  Real digits go through the same uint8 quantisation as samples.
* Classifier agreement: scikit-learn's own example classifier for this data set (the
  "Recognizing hand-written digits" example: `svm.SVC(gamma=0.001)`, an RBF support-vector
  machine on the 64 intensities), fitted (deterministically, libsvm) on all 1,797 real
  digits of `load_digits`. It never sees a generated sample or anything from the generator:
  it is fitted from the real data alone, with settings fixed by scikit-learn's example, the
  same for every run, so it cannot be tuned to (or co-trained with) the models it judges.
  Accuracy = share of samples whose predicted class is the class they were generated for.
  A second classifier family, also fitted on the real digits alone: scikit-learn's
  `LogisticRegression(max_iter=5000)` (a linear model, lbfgs, default C=1) on the same 64
  intensities scaled to 0..1 (`logreg_accuracy`). A training-free third opinion: a
  5-nearest-neighbour vote among the real digits (`knn_accuracy`).
* Fréchet distance: between Gaussians fitted to the features of the samples and of all
  1,797 real digits (FID's formula in this 64-d space). It depends on the sample count N
  (small N inflates it), so each result also carries `frechet_real_floor`: the same distance
  for N real digits drawn without replacement (seed 0), the value a perfect generator would get.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from data.datasets import digits_arrays, digits_to_unit_range
from diffusion.errors import UserError
from evaluation.frechet import frechet_distance, gaussian_stats

NUM_CLASSES = 10


def real_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 real digits as a run would write them: (N, 8, 8) uint8 = clamp(127.5 x + 128), labels (N,)."""
    images, labels = digits_arrays()
    x = digits_to_unit_range(images)
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8), labels


def digits_features(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C), H = W = 8k -> (N, 64) float64 intensities on 0..16."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]  # grey written as RGB: the channels are equal
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % 8:
        raise UserError(f"expected (N, 8k, 8k[, C]) digit images, got shape {images.shape}")
    k = images.shape[1] // 8
    x = images.astype(np.float64).reshape(len(images), 8, k, 8, k).mean(axis=(2, 4))  # (N, 8, 8)
    return x.reshape(len(images), 64) * (16.0 / 255.0)


def _classifier():
    """scikit-learn's own example classifier for this data set ("Recognizing hand-written digits")."""
    from sklearn.svm import SVC

    return SVC(gamma=0.001)


def _linear_classifier():
    """The second family: multinomial logistic regression on the intensities scaled to 0..1 (lbfgs converges)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    return make_pipeline(FunctionTransformer(lambda x: x / 16.0), LogisticRegression(max_iter=5000))


JUDGES = ("svc", "logreg", "knn")  # the classifiers of `judge_per_sample`; row keys accuracy, logreg_accuracy, ...


class DigitsQuality:
    """Fitted once on the real digits; call it on (images, labels) of a run."""

    def __init__(self):
        from sklearn.neighbors import KNeighborsClassifier

        images, labels = real_digits_uint8()
        self.real_features = digits_features(images)                  # (1797, 64)
        self.real_labels = labels
        self.classifier = _classifier().fit(self.real_features, labels)
        self.linear = _linear_classifier().fit(self.real_features, labels)
        self.knn = KNeighborsClassifier(n_neighbors=5).fit(self.real_features, labels)
        self.real_mu, self.real_cov = gaussian_stats(self.real_features)

    def frechet(self, features: np.ndarray) -> float:
        return frechet_distance(*gaussian_stats(features), self.real_mu, self.real_cov)

    def real_floor(self, n: int, seed: int = 0) -> float:
        """Fréchet distance of n real digits (without replacement while n <= 1797) to all of them."""
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(self.real_features), size=n, replace=n > len(self.real_features))
        return self.frechet(self.real_features[pick])

    def correct(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(N,) bool: whether the classifier gives sample k its requested class (the terms of `accuracy`;
        two runs on the same seeds and labels compare sample by sample, for paired standard errors)."""
        return self._correct(digits_features(images), labels)

    def _correct(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels).astype(np.int64)
        if len(features) != len(labels):
            raise UserError(f"{len(features)} images but {len(labels)} labels")
        return self.classifier.predict(features) == labels

    def judge_per_sample(self, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """{judge: (N,) bool} for each of JUDGES: whether that classifier gives sample k its requested class."""
        features = digits_features(images)
        labels = np.asarray(labels).astype(np.int64)
        return {"svc": self._correct(features, labels), "logreg": self.linear.predict(features) == labels,
                "knn": self.knn.predict(features) == labels}

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict:
        features = digits_features(images)
        labels = np.asarray(labels).astype(np.int64)
        correct = self._correct(features, labels)
        per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
        return {
            "accuracy": float(correct.mean()),
            "logreg_accuracy": float((self.linear.predict(features) == labels).mean()),
            "knn_accuracy": float((self.knn.predict(features) == labels).mean()),
            "frechet": self.frechet(features),
            "frechet_real_floor": self.real_floor(len(features)),
            "num_images": int(len(features)),
            "per_class_accuracy": per_class,
        }


@lru_cache(maxsize=1)
def _quality() -> DigitsQuality:
    return DigitsQuality()


def evaluate_digits(images: np.ndarray, labels: np.ndarray) -> dict:
    """The measure with the shared, fitted-once classifier (about a second the first time)."""
    return _quality()(images, labels)


def agreement_per_sample(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: sample k's classifier agreement, with the shared classifier (the mean is `accuracy`)."""
    return _quality().correct(images, labels)


def judges_per_sample(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """{judge: (N,) bool} for the shared classifiers (svc, logreg, knn): paired comparisons of runs."""
    return _quality().judge_per_sample(images, labels)


def classifier_cv_accuracy(folds: int = 5) -> float:
    """The classifier's own accuracy on real digits it has not seen (stratified k-fold): the ceiling for samples."""
    from sklearn.model_selection import cross_val_score

    images, labels = real_digits_uint8()
    return float(cross_val_score(_classifier(), digits_features(images), labels, cv=folds).mean())
