-- The merged rollup tables keep room on each page (fillfactor 70), so a merge's upsert of a
-- group already there is a HOT update: the new row version goes on the same page and no index
-- gets a new entry (a merged row of the current hour or day is updated by every merge, all
-- hour or day long, and no indexed column changes). At the default fillfactor 100 pages were
-- full: 98% of those updates wrote new entries into all three indexes and left dead versions
-- for vacuum, and each merge cost more than the one before (7.8 -> 21.8 us per delta row over
-- six merges of the same groups; 8-10 us steady with fillfactor 70, 89% of updates HOT).
-- Set on the hypertables, it applies to their chunks, existing and new; existing full pages
-- gain room as their rows move.
ALTER TABLE usage_rollup_hourly_merged SET (fillfactor = 70);
ALTER TABLE usage_rollup_daily_merged SET (fillfactor = 70);
ALTER TABLE prompt_fingerprint_daily_merged SET (fillfactor = 70);
ALTER TABLE usage_rollup_hourly_global_merged SET (fillfactor = 70);
ALTER TABLE usage_rollup_daily_global_merged SET (fillfactor = 70);
ALTER TABLE usage_rollup_hourly_key_merged SET (fillfactor = 70);
ALTER TABLE usage_rollup_daily_key_merged SET (fillfactor = 70);
