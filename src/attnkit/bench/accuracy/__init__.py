"""Long-context task accuracy on a real model (`attnkit accuracy`): RULER-style synthetic tasks
generated locally, dense attention against sparse prefill methods and KV-cache policies, with
accuracy, prefill and decode time and KV memory in one results file (docs/accuracy.md).

    from attnkit.bench.accuracy import Settings, parse_configs, run
    doc = run(Settings(lengths=[1024, 2048], configs=parse_configs(["snapkv@0.25", "moba@0.25"])))
    doc["rows"][0]["accuracy"]["score"]
"""

from .configs import BUDGETS, PROFILES, Config, parse_configs
from .run import Settings, run
from .scoring import normalize, score
from .tasks import DEPTHS, TASKS, Sample, make_sample

__all__ = ["BUDGETS", "DEPTHS", "PROFILES", "TASKS", "Config", "Sample", "Settings", "make_sample", "normalize",
           "parse_configs", "run", "score"]
