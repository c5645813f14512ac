"""Assertions and file surgery several test files share (a helper module, not a test file)."""

import os

import jax
import numpy as np


def assert_bit_equal(a_tree, b_tree):
    """Same tree structure, and every leaf has the same dtype, shape and bytes."""
    a_leaves, a_def = jax.tree.flatten(a_tree)
    b_leaves, b_def = jax.tree.flatten(b_tree)
    assert a_def == b_def
    for a, b in zip(a_leaves, b_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def truncate_files(step_dir, subdir="state"):
    """Cut every data file of one checkpoint item in half, as a disk-full or interrupted copy would."""
    count = 0
    for root, _, files in os.walk(os.path.join(step_dir, subdir)):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + "d" in root and os.path.getsize(path) > 0:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                count += 1
    assert count > 0
