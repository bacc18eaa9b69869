"""The rule for names that become file or folder names (labels, concepts, task names)."""

import re

#: Letters, digits and ``. _ + -``, not starting with a dot: no path separators, nothing hidden.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
