-- Index for a project's history by machine type (publisher already has records_publisher).
CREATE INDEX records_machine_type ON records(machine_type);
