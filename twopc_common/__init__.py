"""Code that both daemons (and the client library) need: identifiers, value
conversion between protobuf and Python, errors, failpoints and structured logs.

The coordinator and the participant never import each other; they meet here and in
the generated `twopc_pb` package.
"""
