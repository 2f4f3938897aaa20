"""The layout planner: memory and speed of every TP x PP x DP layout before launch (tools/plan.py).

    from megatronish.planner import Cluster, PRESETS, plan_layouts, recommendation
    plans = plan_layouts(args, Cluster(PRESETS["H100"], nodes=1, devices_per_node=8), vocab_size=50257)
    plan = choose_layout(args, world_size)      # this machine's best layout for a new world size (--layout auto)

Parts: cluster.py (accelerator presets, cluster description, speed constants), parameters.py
(parameter, gradient and optimizer bytes), activations.py (activation bytes and the pipeline
schedules' peak), speed.py (time per iteration), search.py (candidate layouts, checked as
pretrain_gpt.py checks them), report.py (table, JSON, recommendation, --dry-run), calibration.py
(--profile: measured layouts, fitted constants, the goodput profile).
"""

from megatronish.planner.calibration import GoodputProfile, calibrate, default_profile_path, load_profile
from megatronish.planner.cluster import PRESETS, Accelerator, Cluster, SpeedConstants, load_cluster
from megatronish.planner.report import choose_layout, dry_run, plan_details, recommendation, recommended, table
from megatronish.planner.search import Layout, LayoutPlan, SearchSpace, plan_given_layout, plan_layout, plan_layouts

__all__ = ["PRESETS", "Accelerator", "Cluster", "GoodputProfile", "Layout", "LayoutPlan", "SearchSpace",
           "SpeedConstants", "calibrate", "choose_layout", "default_profile_path", "dry_run", "load_cluster",
           "load_profile", "plan_details", "plan_given_layout", "plan_layout", "plan_layouts", "recommendation",
           "recommended", "table"]
