"""gradcomp's studies: the paper tables (:mod:`gradcomp_studies.reproduce`) and the benchmarks
(:mod:`gradcomp_studies.bench`), run by ``gradcomp reproduce`` and ``gradcomp bench``.

They sit beside the library, not in it, and use it only through its public names (``tests/test_layers.py``
checks): what they import from :mod:`gradcomp` is what any user of the library can import.
"""
