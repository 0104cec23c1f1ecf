import sys

from analysis.predictor.calibration import FitIntegrityError
from analysis.predictor.cli import main

try:
    main()
except (ValueError, FitIntegrityError) as e:  # bad input or an in-sample fit: one line, exit 2, nothing written
    print(f"analysis.predictor: {e}", file=sys.stderr)
    sys.exit(2)
