"""MLflow: the record format (``format.py``, its one owner), the writer, the models, the registry."""
