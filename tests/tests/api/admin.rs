//! Admin routes: login, lockout, JWT checks, key lifecycle, tiers, bad input.
