//! Written by a helper (in progress).
