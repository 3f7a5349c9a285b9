"""Image data sets with class labels (configs/data/): the bundled digits, image folders; used by training
and by the digits quality measure (evaluation/digits.py)."""
