"""What goes where, decided before a byte moves: the tensor-parallel plan, each tensor's layout and chunks."""
