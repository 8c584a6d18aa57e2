"""The GPU's SM clock and power while a benchmark run goes, from `nvidia-smi` polled every half
second (bench_generate.py --full-layer records it for each run).

A card at its power cap lowers its clocks, and how far depends on the data in the matmuls: on
one H100 the same kernels ran at 1,899 MHz through a uniform-length run and at 1,660 MHz through
an early-stop run, both at the 700 W cap. Two runs' rates compare only alongside their clocks.
"""

import shutil
import subprocess
import threading
from statistics import mean, median
from types import TracebackType
from typing import Any

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # nvidia-smi's throttle reason bit: the software power cap


class ClockLog:
    """Samples (SM MHz, watts, throttle reasons) of card `index` while the block runs; nothing
    where nvidia-smi is missing. `summary()` describes the loaded part of the run: the samples
    at half or more of the highest power seen."""

    def __init__(self, index: int = 0, every_ms: int = 500, program: str = "nvidia-smi") -> None:
        self.command = [program, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                        f"--loop-ms={every_ms}", f"--id={index}"]
        self.samples: list[tuple[float, float, int]] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> "ClockLog":
        if shutil.which(self.command[0]) is None:
            return self
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((float(parts[0]), float(parts[1]), int(parts[2], 16)))
            except (IndexError, ValueError):
                continue  # a line nvidia-smi could not fill ("[N/A]")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        top = max(watts for _, watts, _ in self.samples)
        loaded = [s for s in self.samples if s[1] >= top / 2]
        return {"samples": len(self.samples), "loaded_samples": len(loaded),
                "sm_mhz_median": median(s[0] for s in loaded),
                "sm_mhz_mean": mean(s[0] for s in loaded),
                "power_w_mean": mean(s[1] for s in loaded),
                "power_capped_fraction": sum(bool(s[2] & SW_POWER_CAP) for s in loaded)
                / len(loaded)}
