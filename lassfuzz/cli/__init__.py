"""The ``lassfuzz`` command line."""
