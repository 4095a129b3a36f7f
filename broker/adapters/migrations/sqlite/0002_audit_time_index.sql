-- Listing the trail by time (`keybroker audit list --since/--until`) reads an index instead
-- of the whole table. Stored times have one fixed-width UTC form, so text order is time order.
CREATE INDEX IF NOT EXISTS audit_events_by_time ON audit_events (time, sequence);
