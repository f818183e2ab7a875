"""The daemon's process: `python3.11 -m token_resource`, the image's entry point and the binary's.

The garbage collector is off while the daemon starts. Its imports create some 50,000 objects that
live as long as the process, and the collections on the way would walk them again and again
(BENCHMARKS.md, "Start-up", measures what that costs). main() moves them out of the collector's
way (gc.freeze) and turns it back on before serving.
"""

import gc

gc.disable()

from token_resource import main  # noqa: E402 (after the collector is off)

main.run()
