"""Training: what a run builds from its config (`run_setup`), the optimizer, the train
state and the compiled update (`train_step`), checkpoints (`checkpointing`) and the loop
(`train`)."""
