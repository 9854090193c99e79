-- sum(bigint) accumulates in 128 bits and returns numeric: a state allocated per group and a
-- numeric result cast back to bigint when stored. The rollup write paths (ingest's statement and
-- the compactor's merges, ~70 sums per row) use this instead: plain 64-bit addition, with an
-- error on overflow, which no usage sum comes near (9.2e18 micro-dollars or tokens).
CREATE AGGREGATE tally_sum8(bigint) (SFUNC = int8pl, STYPE = bigint, COMBINEFUNC = int8pl, PARALLEL = SAFE);
