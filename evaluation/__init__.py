"""Evaluating a trained generator for calc_metrics.py: the arithmetic of each metric, free of any model
(metrics), the face parser (face_parser), and the measurements that render and compare (measures)."""
