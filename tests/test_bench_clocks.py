"""The benchmark's clock log (scripts/clocks.py) reads nvidia-smi's CSV from a real child
process: here a stand-in program on the same command line that prints what nvidia-smi prints."""

import stat
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from clocks import ClockLog  # noqa: E402

# idle, then loaded at the power cap (reason 0x4), a line nvidia-smi could not fill, loaded
LINES = ["345, 72.1, 0x0000000000000001", "1905, 690.5, 0x0000000000000004",
         "[N/A], [N/A], [N/A]", "1650, 694.0, 0x0000000000000004", "1980, 600.0, 0x0"]


def stand_in(tmp_path: Path) -> Path:
    program = tmp_path / "fake-smi"
    program.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "assert '--format=csv,noheader,nounits' in sys.argv, sys.argv\n"
        f"for line in {LINES!r}:\n"
        "    print(line, flush=True)\n"
        "time.sleep(60)\n")
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    return program


def test_the_loaded_part_of_a_run_is_summarised(tmp_path: Path) -> None:
    with ClockLog(0, program=str(stand_in(tmp_path))) as log:
        deadline = time.monotonic() + 20
        while len(log.samples) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(log.samples) == 4  # the [N/A] line skipped
    summary = log.summary()
    assert summary is not None
    assert summary["loaded_samples"] == 3  # at half the top power or more: not the idle one
    assert summary["sm_mhz_median"] == 1905
    assert abs(summary["power_w_mean"] - (690.5 + 694.0 + 600.0) / 3) < 1e-9
    assert abs(summary["power_capped_fraction"] - 2 / 3) < 1e-9


def test_no_nvidia_smi_no_log(tmp_path: Path) -> None:
    with ClockLog(0, program=str(tmp_path / "missing")) as log:
        pass
    assert log.summary() is None
