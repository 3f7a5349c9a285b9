"""Quality measures of generated samples (scripts/evaluate.py): fixed, documented, comparable between runs."""
from evaluation.digits import DigitsQuality, digits_features, evaluate_digits, real_digits_uint8
from evaluation.frechet import frechet_distance, frechet_distance_to_features, gaussian_stats

__all__ = ["DigitsQuality", "digits_features", "evaluate_digits", "real_digits_uint8", "frechet_distance",
           "frechet_distance_to_features", "gaussian_stats"]
