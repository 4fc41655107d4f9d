"""The Monitor: watch a training loop at almost no cost (Contract 5 in DESIGN.md).

```python
from tdiag import Monitor
with Monitor(model, optimizer=opt, run_dir="reports/my-run", log_every=10) as mon:
    for batch in loader:
        ...
        mon.step(loss, tokens=batch.numel())
```
"""

from __future__ import annotations

from tdiag.monitor.alerts import nonfinite_findings
from tdiag.monitor.monitor import Monitor, MonitorConfig, NonFiniteError, TrainingStopped
from tdiag.monitor.recorder import FLIGHT_RECORDER_FILE, FlightRecorder

__all__ = [
    "FLIGHT_RECORDER_FILE",
    "FlightRecorder",
    "Monitor",
    "MonitorConfig",
    "NonFiniteError",
    "TrainingStopped",
    "nonfinite_findings",
]
