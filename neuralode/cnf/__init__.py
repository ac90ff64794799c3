"""Continuous normalizing flows and their trace estimators."""

from ._cnf import CNF as CNF
from ._trace import exact_trace as exact_trace, hutchinson_trace as hutchinson_trace
