import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Examples are derandomized (test_fuzz): hypothesis needs no example database, and its files
# (the database, cached constants) go to a temporary directory, not .hypothesis/ in the tree.
try:
    import tempfile
    from hypothesis import settings as _hypothesis_settings
    from hypothesis.configuration import set_hypothesis_home_dir
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "lopt_ext_hypothesis"))
    _hypothesis_settings.register_profile("lopt_ext", database=None)
    _hypothesis_settings.load_profile("lopt_ext")
except ImportError:  # hypothesis is only needed by test_fuzz
    pass
