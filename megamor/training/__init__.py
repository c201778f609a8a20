"""The one training loop (`loop.Trainer`) and its parts: the training data and its position
(`data`), the train state a checkpoint keeps (`state`), a step's metrics, log line and
metrics.jsonl (`metrics`), depth maps during training (`depth_maps`) and stop signals
(`signals`). The engines it drives live below it, in megamor/engines/."""
