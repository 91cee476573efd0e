"""Data keys shared by the data pipeline, the wrapper, the losses and the CLIs (private module).

mace's batch keys, the keys mace-lr adds, and the ``atoms.info`` keys the calculator reads.
Block-specific keys (outputs and their targets) are declared by the blocks
(:class:`mace_lr.Output`), not listed here.
"""

# batch / context keys (mace's names where mace has them)
POSITIONS = "positions"
CELL = "cell"
PBC = "pbc"
BATCH = "batch"
PTR = "ptr"
NODE_ATTRS = "node_attrs"
EDGE_INDEX = "edge_index"
UNIT_SHIFTS = "unit_shifts"
TOTAL_CHARGE = "total_charge"
TOTAL_SPIN = "total_spin"
EXTERNAL_FIELD = "external_field"
CHARGES = "charges"
DIPOLE = "dipole"
POLARIZABILITY = "polarizability"
#: batch keys of the response targets mace-lr adds
BORN_CHARGES = "born_charges"
POLARIZATION = "polarization"
#: suffix of the [n] presence mask of a per-atom (per-structure) declared target in the batch
PRESENT_SUFFIX = "_present"

# model outputs (ASE's names where ASE has them)
ENERGY = "energy"
FORCES = "forces"
STRESS = "stress"
LR_ENERGY = "lr_energy"
BORN_EFFECTIVE_CHARGES = "born_effective_charges"

# atoms.info keys the calculator and atoms_to_batch read
INFO_CHARGE = "charge"
INFO_SPIN = "spin"
INFO_EXTERNAL_FIELD = "external_field"
INFO_HEAD = "head"
#: atoms.info key → mace data key
INFO_TO_DATA = {INFO_CHARGE: TOTAL_CHARGE, INFO_SPIN: TOTAL_SPIN, INFO_EXTERNAL_FIELD: EXTERNAL_FIELD}
