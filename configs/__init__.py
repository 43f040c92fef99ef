"""The experiment configs shipped with nestrnn (``nestrnn train -c NAME`` reads ``NAME.yaml``).

Installed as the package ``nestrnn.configs`` (the repository folder ``configs/`` is mapped there
with setuptools' package-dir; the YAML files are its package data).
"""
