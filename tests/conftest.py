import sys
from pathlib import Path

# integration helpers (harness.py) are imported by plain name
sys.path.insert(0, str(Path(__file__).parent / "integration"))
