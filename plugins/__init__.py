"""aim_rt.plugins"""
