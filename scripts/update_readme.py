"""Write `attnkit list --markdown` between the README's methods markers."""

import re
from pathlib import Path

from attnkit.registry import markdown_table

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
new = re.sub(r"(<!-- methods:start -->\n).*?(<!-- methods:end -->)", lambda m: m.group(1) + markdown_table() + "\n" + m.group(2),
             text, flags=re.S)
readme.write_text(new)
print("README.md capability table updated" if new != text else "README.md capability table already current")
