"""Evaluation: distributed extraction, exact FAISS kNN, retrieval and IJB-C metrics, plots,
and the evaluator that ties them together. Importing it does nothing."""
