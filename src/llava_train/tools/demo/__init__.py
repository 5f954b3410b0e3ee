"""The end-to-end demo: a synthetic shapes data set trained through both stages on a CPU."""
