"""Input sources: each reads one kind of labelled image set into a data_tools.catalog.Catalog."""
