//! Helpers to run throwaway PostgreSQL clusters as the postgres user.
