"""Built-in tasks, registered through the same ``register_tasks`` hook as third-party plugins.

Installed as the package ``nestrnn.tasks`` (the repository folder ``tasks/`` is mapped there with
setuptools' package-dir). The task interface is documented in :mod:`nestrnn.tasks.base`.

The task modules are imported inside the hook, which the registry calls on the first task lookup:
building a layer or listing memory functions never imports them (or their data and training code).
"""

from __future__ import annotations

from collections.abc import Callable

from nestrnn.hookspecs import hookimpl


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    from nestrnn.tasks.chinese_poems import ChinesePoemsTask
    from nestrnn.tasks.mnist_glimpses import MnistGlimpsesTask
    from nestrnn.tasks.ptb_char import PTBCharTask
    from nestrnn.tasks.synthetic import AddingTask, CopyMemoryTask
    from nestrnn.tasks.text8 import Text8Task
    from nestrnn.tasks.text_file import TextFileTask

    register("ptb_char", PTBCharTask, "Penn Treebank characters (ptb.char.*): bits per character")
    register("text8", Text8Task, "text8, 90M/5M/5M characters of Wikipedia: bits per character")
    register(
        "chinese_poems",
        ChinesePoemsTask,
        "Chinese quatrains (Zhang & Lapata 2014): per-character perplexity and BPC",
    )
    register(
        "mnist_glimpses",
        MnistGlimpsesTask,
        "MNIST as sequences of 7x7 glimpses (16 steps): NLL and error %",
    )
    register("text_file", TextFileTask, "character LM on any UTF-8 file (task.path=FILE): BPC")
    register("copy_memory", CopyMemoryTask, "copy memory: recall symbols after a delay (synthetic)")
    register("adding", AddingTask, "adding problem: sum two marked numbers (synthetic)")
