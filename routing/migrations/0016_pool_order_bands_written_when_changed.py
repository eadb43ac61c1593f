"""The refresh writes a row's band only when it changed (migration 0009
wrote every row under every snapshot).

- A row's ``band_snapshot_id`` is now the snapshot its band was written
  under. The band holds under every later snapshot the refresh found it
  unchanged in, up to the newest whose bands are whole.
- ``routing_latencysnapshot.bands_whole_at``: when the refresh had checked
  every order row under this snapshot, writing those whose band changed.
  A dispatch walks the band index only under a snapshot that has it.
- The two band indexes drop ``band_snapshot_id`` from their columns: a
  scope's rows under several snapshots are now one order. They keep their
  condition (``band_snapshot_id IS NOT NULL``): a row without a band is not
  in them.
- The newest snapshot is marked whole if every row is under it, as the
  refresh before this migration left them; otherwise dispatches read in
  full until the next refresh.
"""

from django.db import migrations, models

from core.migration_sql import vendor_statements

_DROP = ["DROP INDEX IF EXISTS pool_order_band_idx", "DROP INDEX IF EXISTS pool_order_band_spread_idx"]


def _indexes(*, snapshot_column: bool, nulls_first: str) -> list[str]:
    snapshot = "band_snapshot_id, " if snapshot_column else ""
    started = f"last_started_at{nulls_first}"
    return [
        f"""CREATE INDEX pool_order_band_spread_idx ON routing_poolorder
    (scope_id, enabled, plain, {snapshot}binding_rows, band, {started}, credits_sort, name)
    WHERE band_snapshot_id IS NOT NULL""",
        f"""CREATE INDEX pool_order_band_idx ON routing_poolorder
    (scope_id, enabled, plain, {snapshot}band, {started}, credits_sort, name)
    WHERE band_snapshot_id IS NOT NULL""",
    ]


def newest_marked_whole(apps, schema_editor) -> None:
    snapshot_model = apps.get_model("routing", "LatencySnapshot")
    newest = snapshot_model.objects.order_by("-generated_at", "-id").first()
    if newest is None or newest.global_avg_ms is None:
        return
    rows = apps.get_model("routing", "PoolOrder").objects
    if not rows.exclude(band_snapshot_id=newest.pk).exists():
        snapshot_model.objects.filter(pk=newest.pk).update(bands_whole_at=newest.generated_at)


class Migration(migrations.Migration):
    dependencies = [
        ("routing", "0015_binding_rows_delete_per_statement"),
    ]

    operations = [
        migrations.AddField(
            model_name="latencysnapshot", name="bands_whole_at", field=models.DateTimeField(blank=True, null=True)
        ),
        migrations.RunPython(
            vendor_statements(
                {
                    "postgresql": [*_DROP, *_indexes(snapshot_column=False, nulls_first=" NULLS FIRST")],
                    "sqlite": [*_DROP, *_indexes(snapshot_column=False, nulls_first="")],
                },
                what="pool-order band indexes",
            ),
            vendor_statements(
                {
                    "postgresql": [*_DROP, *_indexes(snapshot_column=True, nulls_first=" NULLS FIRST")],
                    "sqlite": [*_DROP, *_indexes(snapshot_column=True, nulls_first="")],
                },
                what="pool-order band indexes",
            ),
        ),
        migrations.RunPython(newest_marked_whole, migrations.RunPython.noop),
    ]
