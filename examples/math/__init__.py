"""The fusion-clj README's math example (reactors in :mod:`examples.math.reactors`, a client in
:mod:`examples.math.client`)."""
