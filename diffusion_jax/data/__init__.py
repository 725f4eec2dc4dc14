"""Training and evaluation data: the image sources (`sources`), the resumable example order
(`example_order`) and the tf.data pipeline that yields sharded global batches
(`input_pipeline`)."""
