"""The specifications beyond test_smd.py's headline: training (test_train.py), the policies against a
cache-free reference (test_reference.py), the task (test_data.py), every script's command line
(test_scripts.py)."""
