-- Which bundled price lists have been seeded, so an admin's later deletions are not undone.
CREATE TABLE price_seeds (
    name       text PRIMARY KEY,
    prices     integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
