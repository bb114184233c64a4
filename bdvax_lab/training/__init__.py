"""The one finetune loop and its configs; repair is that loop on the defender's clean data."""
