"""Saved definitions: graders (versioned) and targets that runs refer to by id."""
