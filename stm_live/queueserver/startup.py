"""The RE Manager worker's startup module (``start-re-manager --startup-module
stm_live.queueserver.startup``): ``RE`` and the plans, nothing else (every generator function
here is a plan to the queue server). ``stm-live queue start`` passes the settings."""

from multiprocessing.util import Finalize as _Finalize

from stm_live.queueserver.environment import QueueEnvironment as _QueueEnvironment
from stm_live.queueserver.environment import QueueSettings as _QueueSettings

# The worker's own console is what the RE Manager captures and publishes: notes print there.
_environment = _QueueEnvironment(_QueueSettings.from_env(), say=lambda text: print(text, flush=True))
# The worker process ends through multiprocessing (no atexit): finish the consumers then.
_Finalize(None, _environment.close, exitpriority=100)

RE = _environment.RE
globals().update(_environment.plans)
