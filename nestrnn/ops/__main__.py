"""``python -m nestrnn.ops``: build the CPU kernel and the native step nodes ahead of time (say, in
a container image) and say which are in use, and why not where one is not."""

from nestrnn.ops.common import native
from nestrnn.ops.outer_lstm import native_nodes

for name, found in (("CPU kernel", native.status()), ("native step nodes", native_nodes.status())):
    print(found.describe(name))
