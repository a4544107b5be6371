"""Tests of the rule modules (onnxslim/graph/rules), one module each, and of the analysis parts."""
