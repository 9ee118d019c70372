"""Who may do what, and how much: accounts and roles, the sign-in throttle, the limits.
Imports core.store (and core.config, core.errors); used by every stage that acts for a user."""
