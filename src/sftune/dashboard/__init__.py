"""``sftune ui``: a local web dashboard over a directory of runs (``pip install 'sftune[ui]'``).

List runs and their state, watch a run's charts while it trains (loss on a linear or log scale),
read its data report and sample generations, compare runs (by step, fraction of the run or trained
tokens seen), preview a recipe's training sequences, chat with a finished run, and start a run from
a form generated from the config schema. ``server`` starts it, ``app`` holds the API, ``runs`` reads
run directories, ``newrun`` starts training, ``static/`` is the page.
"""
