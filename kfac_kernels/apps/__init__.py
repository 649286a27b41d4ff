"""The command-line tools of kfac-kernels and their tasks: ``kfac-train`` (:mod:`.train`,
:mod:`.compare`, the tasks in :mod:`.workloads`, :mod:`.data`, :mod:`.models`) and
``kfac-bench`` (:mod:`.bench`).

They use the library's public API only; the library never imports them. Their extra
dependencies (scikit-learn for the digits, tqdm, matplotlib) come with ``pip install
kfac-kernels[apps]``.
"""
