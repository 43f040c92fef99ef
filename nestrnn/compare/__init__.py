"""``nestrnn compare``: runs found on disk, grouped into configurations, and compared over seeds.

:mod:`.runs` finds run directories and groups them, :mod:`.stats` holds the statistics (scipy,
the ``compare`` extra), :mod:`.table` lays the result out and :mod:`.figure` draws the learning
curves.
"""
