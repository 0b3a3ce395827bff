"""Storage: the interfaces every backend implements, and the errors they raise."""
