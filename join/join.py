"""Join: each row of one dataset with its group's row of another (e.g. a row with its species'
count and means), batch by batch and in the rows' order: a step of two inputs."""

import pyarrow as pa
import pyarrow.compute as pc
from tabulate import tabulate

from stepkit import DataRef, Dataset, Out, Output, dataset_of, step

KEY = "species"  # the column both inputs share
ORDER = "__row"  # each row's place in its batch: Arrow's join does not keep the rows' order


@step(  # literals: `prefect deploy` reads them from the source (tools/deploy/steps.py)
    requires={"rows": {"species": "string"}, "groups": {"species": "string", "count": "int64"}},
    produces={"species": "string", "count": "int64"},
)
def join(rows: Dataset, groups: Dataset, out: Out) -> Output:
    """Add to each row of `rows` the columns of its group in `groups` (one row per group); a row
    of no group gets nulls there."""
    table = groups.read()
    table = table.set_column(table.schema.get_field_index(KEY), KEY, pc.cast(table[KEY], pa.string()))
    if pc.count_distinct(table[KEY]).as_py() != table.num_rows:
        raise ValueError(f"groups has {table.num_rows} rows for fewer distinct {KEY!r}: one row per group")
    extra = [name for name in table.column_names if name != KEY]
    parts: list[DataRef] = []
    for i, batch in enumerate(rows.batches()):
        part = pa.Table.from_batches([batch])
        part = part.set_column(part.schema.get_field_index(KEY), KEY, pc.cast(part[KEY], pa.string()))
        part = part.append_column(ORDER, pa.array(range(part.num_rows), pa.int64()))
        joined = part.join(table, KEY, join_type="left outer").sort_by(ORDER)
        parts.append(out.write_table(joined.select([*batch.schema.names, *extra]), f"part-{i:05}.parquet"))
    output = dataset_of(parts)
    summary = [{"rows": output["rows"], "groups": table.num_rows, "columns": len(output["columns"])}]
    report = f"### join: each row with its {KEY}'s {', '.join(extra)}\n\n{tabulate(summary, 'keys', 'github')}\n"
    return Output(output, summary, report)
