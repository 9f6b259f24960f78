"""The public ops, one module per op family: validation, dispatch, registered ops and autograd."""
