"""SGD that takes its time on one key: the server's request thread waits for the
optimizer, so requests queue up behind it (as behind a big model's update, or a
CPU-starved server). Importable by the servers when they unpickle it (the
workload's directory is on their path)."""
import time

import mxnet as mx


@mx.optimizer.register
class SlowSGD(mx.optimizer.SGD):
    def __init__(self, slow_key=-1, seconds=0.0, **kwargs):
        super().__init__(**kwargs)
        self.slow_key = slow_key
        self.seconds = seconds

    def update_multi_precision(self, index, weight, grad, state):
        # What MXNet's Updater calls (one index, or a list when it aggregates).
        if self.slow_key in (index if isinstance(index, (list, tuple)) else [index]):
            time.sleep(self.seconds)
        super().update_multi_precision(index, weight, grad, state)
